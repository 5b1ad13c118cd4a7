"""Adapter experiments: sticky splits, shadow traffic, request facts and feedback, the report, the canary
guard and promotion. `service.Experiments` is the one object the gateway holds; the rest are its parts."""
