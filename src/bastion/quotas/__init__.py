"""Per-tenant and per-key quotas: rate limiters, budgets, and (to come) the fair queue."""
