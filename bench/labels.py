"""Short labels for settings, shared by the report and the progress lines."""

from __future__ import annotations


def combined_setting_label(settings: dict) -> str:
    """A combined recipe's settings in a few words: 'vtp 0.4, heads 0.5, keep 0.4 at 1,4,7 fused, ...'."""
    passes = settings.get("passes", [])
    where = ",".join(map(str, settings.get("token_locations") or []))
    token_drop = (f"keep {settings.get('keep_rate', 1):g}" + f" at {where}" * bool(where)
                  + " fused" * bool(settings.get("fuse_tokens")))
    parts = {
        "vtp": f"vtp {settings.get('vtp_rate', 0):g}",
        "head-channels": f"heads {settings.get('head_budget', 0):g}",
        "token-drop": token_drop,
        "magnitude": f"{100 * settings.get('sparsity', 0):g} % zeros"
                     + (f" in {settings['mask_pattern']} blocks" if "mask_pattern" in settings else ""),
        "int8": "int8" + (" + patch embed" if settings.get("int8_patch_embed") else ""),
    }
    return ", ".join(parts[p] for p in passes if p in parts)
