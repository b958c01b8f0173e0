"""Logit soft-capping (Gemma 2, Grok): s = c * tanh(s / c)."""

from common import inputs, run

q, k, v = inputs()
q = q * 8  # large logits, so the cap matters
run("softcap", q, k, v, {"softcap": True}, {"softcap": 20.0}, softcap=20.0)
