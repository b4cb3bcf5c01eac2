"""The teacher (stage 1 of arXiv 2510.11056): a causal LM adapted to the platform, taught to reason.

    teacher-dapt   domain-adaptive pre-training: causal-LM loss on the domain corpus     (`dapt`)
    teacher-sft    supervised fine-tuning: prompt -> reasoning chain + label             (`sft`)
    reward-model   a multi-dimensional reward model over (query, service, response)      (`reward`)
    teacher-dpo    preference optimisation against that reward model                     (`dpo`)

`fmt` defines the one prompt and response format every stage (and annotation) shares; `lm` loads
and saves causal LMs (hub id, local directory, `s3://` prefix, or a `scratch:` preset built from a
config); `train` is the Ray Train loop all four stages use (DDP, checkpoints in the stage's
storage prefix, resume on retry).
"""
