"""Tests of daemon/quality/."""
