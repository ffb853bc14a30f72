"""`edge-adapt serve`: an OpenAI-compatible HTTP server whose clients are decoded together in shared steps.

scheduler.py: one thread owns the engine and batches every request's sequences; app.py: the FastAPI routes;
schemas.py / jobs.py / responses.py: OpenAI requests in, scheduler jobs through, OpenAI responses out;
serve.py: the socket, uvicorn and the background model load.
"""
