"""Split-KV decoding (flash-decoding): few queries over a long KV cache, Whisper-style S = 4, T = 1500.

attnc splits the KV axis across workgroups (partial max, sum and accumulator per split) and
merges the splits with the log-sum-exp combine, a second dispatch written in the same DSL.
"""

from common import inputs, run

q, k, v = inputs(B=1, Hq=6, Hkv=6, S=4, T=1500)
run("decode", q, k, v, {"split": True}, {"NSPLIT": 4})
