"""HTTP routes: thin adapters from requests to ``ScoringService`` calls and back."""
