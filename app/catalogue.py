"""The backbone catalogue, read from workers.backbones: the one list of backbones, kept by the
code that loads them (an import the contract allows app/; see pyproject)."""

from __future__ import annotations

from typing import Any

from cvxtune.errors import InvalidInput, WeightsUnavailable
from cvxtune.settings import Settings


def list_backbones(settings: Settings) -> list[dict[str, Any]]:
    from workers.backbones import catalogue

    entries = catalogue(weights_dir=settings.weights_dir)
    for e in entries:  # where the weights lie on the server is not the client's business
        e.get("weights", {}).pop("location", None)
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
