"""The stages: one module per `alignkit <stage>` command, each with `run(cfg)`.

This package's own namespace is the stage registry the layers below may read (eval/report.py does) without
importing any stage module; a stage module never imports another one (tests/unit/test_layers.py).
"""

# Stages whose final/ is a policy to evaluate, under the method name the report uses.
POLICY_METHODS = {"pretrain": "base", "sft": "sft", "dpo": "dpo", "rrhf": "rrhf", "ppo": "ppo", "grpo": "grpo",
                  "raft": "raft", "best_of_n": "best_of_n", "iterate": "iterate"}
