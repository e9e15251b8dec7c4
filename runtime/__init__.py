"""Maia runtime: device profiles, capability, EPContext compile, emulator, sessions, executors, perf model."""
