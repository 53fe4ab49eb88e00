"""Real Lean backends: the REPL client (protocol, process, pool, `ReplEnvironment`), LeanDojo
(`DojoEnvironment`), set-up readiness checks and the pinned versions.

Modules: `protocol` (wire format, typed responses), `process` (one REPL process), `pool`
(processes keyed by imports), `repl_env` (the ProofEnvironment, verification), `dojo_env`
(LeanDojo, optional), `readiness` (checks for `doctor`), `paths` (project, pins),
`verification` (the fresh-name re-check and axiom audit both backends share), `sandbox`
(bubblewrap around every Lean process). Untrusted-input screening lives in
`prover.lean.untrusted`.
"""
