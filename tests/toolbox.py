"""The tests' tools that live in .venv-tools (Python >= 3.12): Helm, kubernetes-validate, Lua.

    toolbox.py lint CHART
    toolbox.py install KUBECONFIG NAMESPACE RELEASE CHART VALUES_JSON [UPGRADE_VALUES_JSON...]
    toolbox.py refusals KUBECONFIG NAMESPACE RELEASE CHART VALUES_JSON...
    toolbox.py validate KUBERNETES_VERSION < objects.json
    toolbox.py health LUA_FILE < object.json

Each prints one JSON document. `install` is Helm's own install action (the Go library that
helm-sdkpy ships), against the API server the kubeconfig names, without waiting for
readiness. The caller sets HELM_DRIVER=memory in its environment (Helm's Go runtime reads the
environment the process started with): the release record stays in memory, not in a Secret.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any


def lint(chart: str) -> Any:
    import helm_sdkpy

    config = helm_sdkpy.Configuration(namespace="default")
    return asyncio.run(helm_sdkpy.Lint(config).run(chart))


def install(kubeconfig: str, namespace: str, release: str, chart: str, *values: str) -> Any:
    """Install with the first values, then upgrade with each next: a manifest per revision."""
    import helm_sdkpy

    config = helm_sdkpy.Configuration(namespace=namespace, kubeconfig=kubeconfig)

    async def revisions() -> list[dict[str, Any]]:
        first, *later = (json.loads(text) for text in values)
        done = [await helm_sdkpy.Install(config).run(release, chart, values=first, wait=False)]
        for upgrade in later:
            action = helm_sdkpy.Upgrade(config)
            done.append(await action.run(release, chart, values=upgrade, wait=False))
        return done

    return [
        {"manifest": result["manifest"], "notes": result["info"].get("notes", "")}
        for result in asyncio.run(revisions())
    ]


def refusals(kubeconfig: str, namespace: str, release: str, chart: str, *values: str) -> Any:
    """For each values document, Helm's error when it refuses to install: null if it installs."""
    import helm_sdkpy

    config = helm_sdkpy.Configuration(namespace=namespace, kubeconfig=kubeconfig)

    async def attempt(text: str) -> str | None:
        try:
            await helm_sdkpy.Install(config).run(
                release, chart, values=json.loads(text), wait=False
            )
        except helm_sdkpy.HelmError as error:
            return str(error)
        return None

    return [asyncio.run(attempt(text)) for text in values]


def validate(version: str) -> Any:
    """[kind, name, error] for each object of stdin that the release's schema refuses."""
    import kubernetes_validate

    problems = []
    for obj in json.load(sys.stdin):
        name = obj.get("metadata", {}).get("name", "?")
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            problems.append([obj.get("kind"), name, "no schema"])
        except kubernetes_validate.ValidationError as error:
            path = "/".join(str(part) for part in error.path)
            problems.append([obj.get("kind"), name, f"{path}: {error.message}"])
    return problems


def health(script: str) -> Any:
    """What an Argo CD health script (Lua, with the object as `obj`) returns for stdin's object."""
    from lupa import lua51  # Argo CD runs health scripts in gopher-lua, a Lua 5.1

    lua = lua51.LuaRuntime()
    lua.globals().obj = _to_lua(lua, json.load(sys.stdin))
    result = lua.execute(Path(script).read_text())
    return {"status": result["status"], "message": result["message"]}


def _to_lua(lua: Any, value: Any) -> Any:
    if isinstance(value, dict):
        return lua.table_from({key: _to_lua(lua, item) for key, item in value.items()})
    if isinstance(value, list):
        return lua.table_from([_to_lua(lua, item) for item in value])
    return value


def main(argv: list[str]) -> None:
    commands = {
        "lint": lint,
        "install": install,
        "refusals": refusals,
        "validate": validate,
        "health": health,
    }
    print(json.dumps(commands[argv[0]](*argv[1:])))


if __name__ == "__main__":
    main(sys.argv[1:])
