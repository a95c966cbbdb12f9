"""Shared pytest fixtures; the repo root is on sys.path so `bench`, `models`, ... import."""
