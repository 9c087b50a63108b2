// A real OpenID Connect provider for the JWT identity tests (panva's oidc-provider).
//
//   node provider.mjs <config.json>
//
// config.json: {"port": N, "issuer": "http://127.0.0.1:N", "keys": [private JWKs],
//               "clients": [{"client_id", "client_secret", "tier", "ttl", "format"}]}
// Clients get access tokens by the client_credentials grant: JWTs (resource indicators make
// them so), or opaque ones for a client whose format is "opaque"; each token carries the
// client's `tier` and `groups`. Any client may introspect (RFC 7662, HTTP Basic client
// authentication) and revoke tokens. Prints "ready" once it listens; stops on SIGTERM.
import { readFileSync } from 'node:fs';
import Provider from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const clients = new Map(config.clients.map((c) => [c.client_id, c]));
const RESOURCE = 'urn:tokengateway:llm';

const provider = new Provider(config.issuer, {
  jwks: { keys: config.keys },
  clients: config.clients.map((c) => ({
    client_id: c.client_id,
    client_secret: c.client_secret,
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_post',
    introspection_endpoint_auth_method: 'client_secret_basic',
    revocation_endpoint_auth_method: 'client_secret_post',
  })),
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    revocation: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => RESOURCE,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resource, client) => ({
        scope: 'llm',
        audience: RESOURCE,
        accessTokenFormat: clients.get(client.clientId)?.format ?? 'jwt',
        accessTokenTTL: clients.get(client.clientId)?.ttl ?? 3600,
        jwt: { sign: { alg: config.alg ?? 'RS256' } },
      }),
    },
  },
  extraTokenClaims: (ctx, token) => {
    const client = clients.get(token.clientId) ?? {};
    return { tier: client.tier, groups: [client.tier] };
  },
});
provider.proxy = false;

const server = provider.listen(config.port, '127.0.0.1', () => {
  console.log('ready');
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
