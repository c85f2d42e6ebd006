"""skylab's data plane: run one trial and report how it went.

`skylab-trainer run` (`skylab_trainer.cli`) is the entrypoint of trial pods and of the
local executor. The trial contract shared with the control plane lives in
`skylab_trainer.report` (the final JSON report) and `skylab_trainer.progress`
(per-step progress lines).
"""
