"""The backbone catalogue, read from workers.backbones: the one list of backbones, kept by the
code that loads them (an import the contract allows app/; see pyproject)."""

from __future__ import annotations

from typing import Any

from cvxtune.contracts import HEAD_OUTPUT, OUTPUT_FIELD, HeadSpec, head_kinds_for
from cvxtune.errors import InvalidInput, WeightsUnavailable
from cvxtune.settings import Settings


def list_backbones(settings: Settings) -> list[dict[str, Any]]:
    from workers.backbones import catalogue

    entries = catalogue(weights_dir=settings.weights_dir)
    for e in entries:  # where the weights lie on the server is not the client's business
        e.get("weights", {}).pop("location", None)
        e["head_kinds"] = head_kinds_for(e)
    return entries


def check_backbone(settings: Settings, name: str) -> dict[str, Any]:
    """The catalogue entry; InvalidInput if unknown, WeightsUnavailable if it cannot run here."""
    entries = {b["name"]: b for b in list_backbones(settings)}
    if name not in entries:
        raise InvalidInput(
            f"unknown backbone {name!r}; choose one of {sorted(entries)}", code="unknown_backbone"
        )
    entry = entries[name]
    if not entry["weights_available"] and not settings.allow_random_weights:
        raise WeightsUnavailable(
            f"weights for {name} are not available on this server; put them in the weights "
            "directory (CVXTUNE_WEIGHTS_DIR) or choose a backbone whose weights are available"
        )
    return entry


def check_head(entry: dict[str, Any], head: HeadSpec) -> None:
    """Refuse a head the backbone cannot feed: a missing output (unsupported_head_kind) or
    options that do not fit the output's shape (invalid_input)."""
    if head.kind not in head_kinds_for(entry):
        raise InvalidInput(
            f"backbone {entry['name']} has no {HEAD_OUTPUT[head.kind]} output, so it cannot "
            f"feed a {head.kind} head; its head kinds are {', '.join(head_kinds_for(entry))}",
            code="unsupported_head_kind",
        )
    shape = entry[OUTPUT_FIELD[head.output]]
    try:
        head.check_input([shape] if isinstance(shape, int) else shape)
    except ValueError as e:
        raise InvalidInput(f"head: {e} of backbone {entry['name']}") from e
