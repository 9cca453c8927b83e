"""Conversation state: SQLAlchemy 2.0 models, engine set-up, Alembic migrations and store functions."""
