"""The pipeline's stages, in DAG order: fetch -> reconcile -> write."""
from . import fetch, reconcile, write

STAGES = [fetch.STAGE, reconcile.STAGE, write.STAGE]
