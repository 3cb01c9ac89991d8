"""Tests of daemon/data/."""
