"""One or more examples per command, shown at the end of its ``--help`` (and so in docs/cli.md).

Keyed by the command's path; cli/main.py renders each list as the command's epilog. A test checks
that every command has an example and that each example parses with the command's own options.
A command added to the CLI needs its line here.
"""

from __future__ import annotations

EXAMPLES: dict[str, list[str]] = {
    "loramgr install": [
        "loramgr install ./runs/sql-lora --name sql-assistant --version 1.0.0",
        "loramgr install hf://owner/repo@main --name style",
        "loramgr install ./loras --recursive",
    ],
    "loramgr list": ["loramgr list", "loramgr list sql-assistant --digests", "loramgr list --base-family flux1"],
    "loramgr show": ["loramgr show sql-assistant@stable", "loramgr show 'sql-assistant>=1,<2' --json",
                     "loramgr show sql-chat --recipe > sql-chat.toml"],
    "loramgr tag": ["loramgr tag sql-assistant==1.0.0 stable"],
    "loramgr untag": ["loramgr untag sql-assistant stable"],
    "loramgr export": ["loramgr export sql-assistant@stable ./out",
                       "loramgr export sql-assistant ./sql.safetensors --format kohya --base llama-3.2-1b"],
    "loramgr remove": ["loramgr remove sql-assistant==1.0.0 --dry-run", "loramgr remove 'sql-assistant<1.1' --all"],
    "loramgr verify": ["loramgr verify", "loramgr verify sql-assistant==1.1.0 --repair"],
    "loramgr gc": ["loramgr gc --dry-run", "loramgr gc"],
    "loramgr doctor": ["loramgr doctor --rebuild"],
    "loramgr env": ["loramgr env", "loramgr env --json"],
    "loramgr combine": [
        "loramgr combine sql-assistant chat-style --weights 0.7,0.3 --name sql-chat",
        "loramgr combine sql-assistant chat-style --method svd --rank 8 --name sql-chat-r8",
        "loramgr combine sql-assistant chat-style --method ties --density 0.3 --output ./sql-chat-ties",
        "loramgr combine --recipe sql-chat.toml",
    ],
    "loramgr compress": ["loramgr compress sql-chat --energy 0.9 --name sql-chat-small",
                         "loramgr compress sql-chat --rank 4 --output ./sql-chat-r4"],
    "loramgr base": ["loramgr base add ./Llama-3.2-1B --name llama-3.2-1b", "loramgr base list"],
    "loramgr base add": ["loramgr base add ./Llama-3.2-1B --name llama-3.2-1b --revision main"],
    "loramgr base list": ["loramgr base list --json"],
    "loramgr base show": ["loramgr base show llama-3.2-1b --modules"],
    "loramgr base remove": ["loramgr base remove llama-3.2-1b", "loramgr base remove llama-3.2-1b --force"],
    "loramgr check": ["loramgr check sql-assistant --base llama-3.2-1b --engine vllm:max-rank=64",
                      "loramgr check ./runs/sql-lora --values --json"],
    "loramgr push": ["loramgr push sql-assistant==1.0.0 --repo me/sql-assistant --dry-run",
                     "loramgr push sql-assistant==1.0.0 oci://localhost:5000/adapters/sql-assistant"],
    "loramgr lock": ["loramgr lock", "loramgr lock --file loramgr.toml --output loramgr.lock"],
    "loramgr sync": ["loramgr sync", "loramgr sync --file loramgr.lock"],
    "loramgr list-remote": ["loramgr list-remote oci://localhost:5000/adapters/sql-assistant"],
    "loramgr deploy": ["loramgr deploy vllm ./lora-cache sql-assistant@stable --served-model meta-llama/Llama-3.2-1B"],
    "loramgr push-to-server": ["loramgr push-to-server http://127.0.0.1:8000 sql-assistant@stable",
                               "loramgr push-to-server http://127.0.0.1:8000 sql-assistant@stable --unload"],
    "loramgr duplicates": ["loramgr duplicates --json"],
    "loramgr link": ["loramgr link ./ComfyUI/models/loras"],
    "loramgr demo": ["loramgr demo"],
    "loramgr convert-init": ["loramgr convert-init ./runs/pissa --initial ./runs/pissa-init --output ./pissa-lora"],
}


def epilog(path: str) -> str | None:
    """The examples of the command at ``path`` ("loramgr base add") as a help epilog, kept verbatim."""
    lines = EXAMPLES.get(path)
    if not lines:
        return None
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)
