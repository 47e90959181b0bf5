"""Route groups the gateway includes, each an APIRouter around the gateway's tenant dependency."""
