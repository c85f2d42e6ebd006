"""The LLM strategy: settings, prices, the edit tool, the prompt, guardrails, the loop."""
