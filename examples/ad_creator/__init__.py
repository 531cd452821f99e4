"""The Ad Creator: PydanticAI agents and direct Gemini calls, recorded in one usage ledger.

Run it with `python -m examples.ad_creator` (or `make demo`). See `docs/example.md`.
"""

from __future__ import annotations

from .app import AdDeps, ad_creation_agent, build_agents, main, orchestrator, run_ad_creator

__all__ = ('AdDeps', 'ad_creation_agent', 'build_agents', 'main', 'orchestrator', 'run_ad_creator')
