"""Decode worker: reserves KV blocks, receives the prompt's KV, continuous-batches decode and streams tokens."""
