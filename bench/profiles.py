"""What each prune-and-bench profile runs: a list of (method, setting) entries plus timing.

`default` is the first thing a newcomer runs: every method once, at most 12 minutes on 2 cores from a
clean clone. `full` is every row the README's results come from. Anything `default` leaves out is one
`--only METHOD=SETTING` away (the report lists it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .spec import Entry

MASKS = ("magnitude", "obs-layerwise", "obs-fisher")


def both(text: str) -> Entry:
    """An entry with an accuracy row on digits-vit and a timed row on the speed model."""
    method, _, setting = text.partition("=")
    return Entry(method, setting)


def digits(text: str) -> Entry:
    method, _, setting = text.partition("=")
    return Entry(method, setting, speed=False)


def speed(text: str) -> Entry:
    method, _, setting = text.partition("=")
    return Entry(method, setting, digits=False)


@dataclass(frozen=True)
class Profile:
    name: str
    entries: tuple[Entry, ...]
    batch_sizes: tuple[int, ...] = (1, 16)
    rounds: int = 3  # alternating timing rounds per batch size
    seconds_per_block: float = 2.0  # consecutive calls per runner per round
    epochs: int = 4  # the standard digits-vit fine-tune
    seeds: dict[str, int] = field(default_factory=dict)  # per method; a spec's own default otherwise
    calibration_samples: int = 64  # images a data-aware solver sees on the speed model
    # columns beyond one per engine: OpenVINO in bf16 beside f32 where the CPU runs it, and vitsparse's
    # kernels (openvino-sparse) beside the engines everyone can install
    extra_columns: bool = True


DEFAULT = Profile(
    "default",
    entries=(
        *(digits(f"{m}=0.75") for m in MASKS),
        both("magnitude=0.9"),
        both("magnitude=0.75@1x4"),
        both("vtp=0.4"),
        both("heads=0.3:full"),
        digits("heads=0.3:l1"),
        digits("tokens=0.6:learned"),  # 34 % fewer MACs on digits-vit
        both("tokens=0.7:learned"),  # 32 % fewer on deit_small (28 % on digits-vit)
        both("combined=recipes/combined.yaml"),
        both("combined=recipes/combined.yaml+int8"),
        digits("int8=0.75"),
    ),
    rounds=2,
    seconds_per_block=0.5,
    # heads: 2 seeds, the fewest with a spread (the paired difference to l1 and its standard error)
    seeds={"heads": 2, "tokens": 1, "combined": 1},
    extra_columns=False,  # openvino:bf16 and openvino-sparse (f32, bf16): `full`'s, or one `-e` away
)

FULL = Profile(
    "full",
    entries=(
        *(digits(f"{m}={s}") for m in MASKS for s in (0.5, 0.6, 0.7, 0.75, 0.8, 0.9)),
        *(speed(f"magnitude={s}") for s in ("0.5", "0.75", "0.9", "2:4", "0.75@1x4")),
        speed("obs-layerwise=0.75"),  # how long the solvers take on the speed model
        speed("obs-fisher=0.75"),
        both("vtp=0.2+int8"),
        both("vtp=0.4+int8"),
        speed("vtp=0.4:1"),  # what rounding kept counts to 8 costs or buys in speed
        *(both(f"heads={b}:full+int8") for b in (0.3, 0.5)),
        *(digits(f"heads={b}:{v}") for b in (0.3, 0.5)
          for v in ("l1", "no-similarity", "no-reweight", "no-init")),
        *(both(f"tokens={k}:fixed+int8") for k in (0.5, 0.7)),
        digits("tokens=0.6:fixed"),
        *(digits(f"tokens={k}:learned") for k in (0.5, 0.6, 0.7)),
        both("combined=recipes/combined.yaml"),
        both("combined=recipes/frontier/light.yaml+int8"),
        both("combined=recipes/combined.yaml+int8"),
        both("combined=recipes/frontier/mid.yaml+int8"),
        both("combined=recipes/combined-int8-speed.yaml"),
        *(both(f"int8={s}") for s in ("dense", "0.75", "0.9")),
        speed("int8=0.75@1x4"),
    ),
    # ~180 runners at each batch size (43 models on up to 5 columns, baselines again in each group of 8):
    # 5 rounds of 4 s blocks would take 1.5 hours per batch size
    rounds=2,
    seconds_per_block=1.0,
    epochs=10,
    seeds={"heads": 8, "tokens": 8, "combined": 3},
    calibration_samples=128,
)

PROFILES: dict[str, Profile] = {p.name: p for p in (DEFAULT, FULL)}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose from {', '.join(PROFILES)}") from None
