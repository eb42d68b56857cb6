"""The versioned JSON API: one router per resource, mounted under /api/v1."""

from fastapi import APIRouter

from app.api import compare, contrast, features, graphs, jobs, live, models, relations, runs, saes, search, structure

api_router = APIRouter(prefix="/api/v1")
for module in (models, saes, compare, features, search, jobs, runs, live, contrast, relations, structure, graphs):
    api_router.include_router(module.router)
