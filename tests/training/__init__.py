"""Tests of daemon/training/."""
