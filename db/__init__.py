"""The database link of pacsnode: models, engine, migrations and the query layer."""
