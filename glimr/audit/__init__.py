"""`glimr audit`: find the training classes that show the evaluation sets' landmarks (train/test class overlap),
the RGLDv2-clean procedure of the CiDeR paper (CVPR 2024, Sec. 3) as a command.

overlap.py (eval sets, training index, global retrieval, flagging) -> verify.py (spatial verification with
glimr.rerank.sv) -> review.py (review.html) -> pipeline.py (run_audit, apply_decisions) -> cli.py (`glimr audit`).
planted.py builds a planted-overlap check from real photos (tests, benchmarks/audit_planted.py).
A leaf of the package: it imports io, data, extract, index and rerank; nothing imports it.
"""
