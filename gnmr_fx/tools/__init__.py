"""The tools: capture, inspect, diff, export, report (layer 4; see README.md)."""
