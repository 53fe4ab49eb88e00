"""Expert iteration (the paper's Table 4): search proves theorems without proofs, their
(state, tactic) pairs join the training data, the N_eff models are retrained, the ensemble
is evaluated again. `run_expert_iteration` drives a resumable run directory."""

from prover.expert_iteration.config import ExpertConfig, ExpertConfigError, SearchSettings, load_expert_config
from prover.expert_iteration.runner import ExpertRunError, run_expert_iteration

__all__ = [
    "ExpertConfig",
    "ExpertConfigError",
    "ExpertRunError",
    "SearchSettings",
    "load_expert_config",
    "run_expert_iteration",
]
