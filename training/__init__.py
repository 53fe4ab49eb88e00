"""Fine-tuning causal LMs on LeanDojo (proof state -> tactic) pairs with step-wise DCO.

A leaf package: it imports nothing from `search`, `prover` or `service`.
"""
