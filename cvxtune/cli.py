"""The `cvxtune` command.

Each sub-command lives with the code it drives and is imported only when it is called, so
`cvxtune keys` never pays for importing torch and `cvxtune embed` never imports the web app.
A sub-command is a function taking the remaining argv and returning an exit status.
"""

from __future__ import annotations

import importlib
import sys

# name -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "embed": ("workers.cli:embed_main", "extract frozen-backbone embeddings to an .npz file"),
    "serve": ("app.cli:serve_main", "run the API and a worker on the embedded default"),
    "worker": ("app.cli:worker_main", "run a Celery worker alone (broker from settings)"),
    "keys": ("app.cli:keys_main", "manage API keys: keys create --project NAME"),
    # Clients of a running service ($CVXTUNE_URL, $CVXTUNE_API_KEY); httpx only, no torch.
    "datasets": ("cvxtune.client:datasets_main", "upload, list, show or delete datasets"),
    "finetune": ("cvxtune.client:finetune_main", "fit a head on a dataset (--wait to follow)"),
    "jobs": ("cvxtune.client:jobs_main", "list, show or cancel finetune jobs"),
    "heads": ("cvxtune.client:heads_main", "list, show, download or delete fitted heads"),
    "predict": ("cvxtune.client:predict_main", "predict images or embeddings with a head"),
    "backbones": ("cvxtune.client:backbones_main", "the service's backbones and their weights"),
}
# Commands that run backbones or fit heads start again with cvxtune.memory's malloc settings.
HEAVY = {"embed", "serve", "worker"}


def _usage() -> str:
    lines = ["usage: cvxtune COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    if args[0] in {"-V", "--version"}:
        from cvxtune import __version__

        print(__version__)
        return 0
    name = args[0]
    if name not in COMMANDS:
        print(f"cvxtune: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if name in HEAVY and argv is None:
        from cvxtune.memory import reexec_tuned

        reexec_tuned()
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(args[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
