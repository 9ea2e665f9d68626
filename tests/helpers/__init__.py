"""Test helpers: real gloo ranks (distributed), tiny-checkpoint writers (checkpoints), the session's tiny
checkpoints (tiny), installed asset wheels (assets) and the one-rank/TP parity probes (parity)."""
