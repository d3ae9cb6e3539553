"""
Template of the generated `nanollm_titan.py`: the generator writes FAMILY, FLAVOR, FLAVOR_ARGS and
EOS_ID above the marker line and this file's code below it. torchtitan imports the module through
`[experimental] custom_import` before it looks up the train spec.
"""

FAMILY, FLAVOR, FLAVOR_ARGS = "llama3", "tiny", {}
# --- generated above ---
import dataclasses  # noqa: E402

from torchtitan.protocols.train_spec import get_train_spec, register_train_spec  # noqa: E402


def _register() -> None:
    """Register nanollm_<family> = torchtitan's <family> spec with our flavor added."""
    base = get_train_spec(FAMILY)
    args_cls = type(next(iter(base.model_args.values())))
    args = dict(FLAVOR_ARGS)
    if "rope_scaling" in args:
        rope = args.pop("rope_scaling")
        args["rope_scaling_args"] = type(args_cls().rope_scaling_args)(**rope)
    flavors = {FLAVOR: args_cls(**args)}
    register_train_spec(dataclasses.replace(base, name=f"nanollm_{FAMILY}", model_args=flavors))


_register()
