"""GENRE generation: prompt schemes, reply parsing, LLM providers, driver."""
