"""Megatron-LM integration of UltraMem.

    --spec megatron_ultramem.megatron_lm ultramem_block_spec     the GPT block spec, built from the flags
    --spec megatron_ultramem.megatron_lm ultramem_hybrid_stack_spec
                                                                 the HybridModel stack spec (0.19+)
    add_ultramem_args / validate_ultramem_args                   the --ultramem-* flags (arguments.py)
    install_megatron_lm_hooks                                    once-per-step Tucker refresh, value
                                                                 LR group and scheduler, logging
                                                                 (hooks.py)
    python -m megatron_ultramem.megatron_lm.pretrain_gpt ...     unmodified pretrain_gpt.py with all
                                                                 of the above (pretrain_gpt.py)
    python -m megatron_ultramem.megatron_lm.convert ...          MoE argv -> UltraMem argv (convert.py)

This package's import loads nothing from Megatron (names resolve lazily): the entry point must put
the Megatron-LM checkout on sys.path before `megatron` is first imported.

`ultramem_block_spec` is created by the module `__getattr__` below and stored in the package
globals: Megatron-LM's `import_module` reads `vars(module)[NAME]` after `__import__(MODULE,
fromlist=[NAME])`, whose fromlist handling calls `hasattr` (and so this `__getattr__`) first.
"""

_LAZY = {
    "add_ultramem_args": "arguments",
    "validate_ultramem_args": "arguments",
    "chain_args_providers": "arguments",
    "ultramem_spec_in_use": "arguments",
    "UltraMemBlockSpec": "spec",
    "block_spec_from_args": "spec",
    "ensure_ultramem_config": "spec",
    "ultramem_config_from_args": "spec",
    "hybrid_stack_spec_from_args": "spec",
    "set_args_provider": "spec",
    "install_megatron_lm_hooks": "hooks",
    "uninstall_megatron_lm_hooks": "hooks",
    "UltraMemTrainingHooks": "hooks",
    "moe_to_ultramem_argv": "convert",
}

SPEC_NAMES = ("ultramem_block_spec", "ultramem_hybrid_stack_spec")

__all__ = sorted(_LAZY) + list(SPEC_NAMES)


def __getattr__(name):
    if name in SPEC_NAMES:
        try:
            from . import spec

            if name == "ultramem_block_spec":
                obj = spec.UltraMemBlockSpec()
            else:
                obj = spec.hybrid_stack_spec_from_args(spec.get_args())
        except AttributeError as err:
            # hasattr() (Megatron's import path) would swallow an AttributeError and report a
            # missing name instead: surface it.
            raise RuntimeError(f"building {name} failed: {err}") from err
        globals()[name] = obj
        return obj
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def reset_spec_cache() -> None:
    """Drop the cached spec object (tests, or a second model with other flags in one process)."""
    for name in SPEC_NAMES:
        globals().pop(name, None)
