"""Tornado handlers: thin, one class per resource, delegating to engine.web.services."""
