"""Evaluation: interleaved speed benchmarks, cost measurement, the lm-eval model and offline tasks, the
HumanEval sandbox and quality parity."""
