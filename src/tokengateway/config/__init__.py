"""Manifests to what the data path enforces: `compile` builds the routes and policies
(`CompiledConfig`) from the resources, `routing` matches HTTPRoutes, `backends` resolves
Services to addresses (or simulators), `status` writes the policies' conditions."""
