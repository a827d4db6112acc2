"""Reporting: win rates with intervals, and pictures for people."""
