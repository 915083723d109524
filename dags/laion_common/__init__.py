"""Shared DAG building blocks: thin wrappers that call laion_tasks."""
