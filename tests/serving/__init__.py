"""Tests of daemon/serving/."""
