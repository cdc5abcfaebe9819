"""Traces: a frozen multi-exit backbone's per-layer outputs, built once per split and cached by content (encoder
traces, causal-LM token traces, cross-fitted training states), so envs and evaluation replay them as lookups."""
