"""LoRA fine-tuning of a released model (see finetune/README.md). A package, imported as `finetune.<module>`
with the repository root on sys.path; its entry scripts (train.py, merge_adapter.py, inference.py,
validate_config.py, smollm2.py, data/make_math.py) put the root there themselves, so they run from anywhere."""
