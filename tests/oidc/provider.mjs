// The OpenID Connect provider the federation end-to-end tests sign in with: panva's
// oidc-provider (a certified OP) with one static client, run by tests/e2e/support/oidc.rs.
//
//   node tests/oidc/provider.mjs --client-id ID --client-secret SECRET \
//     --redirect-uris http://127.0.0.1:8080/cb[,more] [--port 0] [--id-token-alg RS256|ES256]
//
// (or OIDC_CLIENT_ID, OIDC_CLIENT_SECRET, OIDC_REDIRECT_URIS, OIDC_PORT, OIDC_ID_TOKEN_ALG).
//
// - Listens on 127.0.0.1 (a free port unless --port is given) and prints exactly one line on
//   stdout, `oidc-provider ready http://127.0.0.1:<port>`; the issuer is that URL. Everything
//   else goes to stderr.
// - Exits when its stdin closes (the test that started it ended, however it ended), on
//   SIGTERM and on SIGINT.
// - The client: authorization_code + response_type code only, PKCE S256 required,
//   client_secret_basic (oidc-provider also accepts client_secret_post for such a client).
// - Login is oidc-provider's devInteractions form (POST login + password to
//   /interaction/<uid>): any password is accepted and the login becomes the account id.
//   Consent is granted automatically (loadExistingGrant), so login is the only interaction.
// - Accounts: sub = email = the login, email_verified = false when the login starts with
//   "unverified", name = "User <login>". Scope claims are in the ID token too
//   (conformIdTokenClaims: false), as most real providers do.
// - The authorization response carries `iss` (RFC 9207): oidc-provider v9 always sends it
//   for response_type code and says so in its discovery document.
import * as crypto from 'node:crypto';
import * as http from 'node:http';
import { parseArgs } from 'node:util';

// stdout is for the ready line only.
console.log = console.error;
console.info = console.error;

// oidc-provider's warnings about what a test provider is meant to be: development
// interactions, the in-memory adapter, and Node.js 20 (v9 asks for 22 LTS but works on 20).
// Anything else it says still shows.
const expected = [
  'a quick start development-only feature devInteractions is enabled',
  'a quick start development-only in-memory adapter is used',
  'Unsupported runtime. Use Node.js v22.x LTS',
];
const warn = console.warn;
console.warn = (...args) => {
  const text = args.map(String).join(' ');
  if (!expected.some((warning) => text.includes(warning))) warn(...args);
};

const { values: args } = parseArgs({
  options: {
    'client-id': { type: 'string', default: process.env.OIDC_CLIENT_ID },
    'client-secret': { type: 'string', default: process.env.OIDC_CLIENT_SECRET },
    'redirect-uris': { type: 'string', default: process.env.OIDC_REDIRECT_URIS },
    port: { type: 'string', default: process.env.OIDC_PORT ?? '0' },
    'id-token-alg': { type: 'string', default: process.env.OIDC_ID_TOKEN_ALG ?? 'RS256' },
  },
  strict: true,
});

function fail(message) {
  console.error(`provider.mjs: ${message}`);
  process.exit(2);
}

const clientId = args['client-id'] || fail('--client-id is required');
const clientSecret = args['client-secret'] || fail('--client-secret is required');
const redirectUris = (args['redirect-uris'] ?? '').split(',').map((uri) => uri.trim()).filter(Boolean);
if (redirectUris.length === 0) fail('--redirect-uris is required');
const port = Number(args.port);
if (!Number.isInteger(port) || port < 0 || port > 65535) fail(`bad --port ${args.port}`);
const idTokenAlg = args['id-token-alg'];
if (!['RS256', 'ES256'].includes(idTokenAlg)) fail(`--id-token-alg must be RS256 or ES256, not ${idTokenAlg}`);

// Imported after the console is set up: oidc-provider warns while it loads.
const { default: Provider } = await import('oidc-provider');

// The issuer names the port, so listen first and attach the provider once the port is known
// (no request can arrive before: nobody knows the port until the ready line).
const server = http.createServer();
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(port, '127.0.0.1', resolve);
});
const issuer = `http://127.0.0.1:${server.address().port}`;

// Fresh signing keys for each run: RS256 (the default for ID tokens) and ES256.
function signingKey(type, options, alg) {
  const { privateKey } = crypto.generateKeyPairSync(type, options);
  return { ...privateKey.export({ format: 'jwk' }), kid: `${alg.toLowerCase()}-${crypto.randomUUID()}`, alg, use: 'sig' };
}
const jwks = {
  keys: [
    signingKey('rsa', { modulusLength: 2048 }, 'RS256'),
    signingKey('ec', { namedCurve: 'P-256' }, 'ES256'),
  ],
};

const provider = new Provider(issuer, {
  clients: [{
    client_id: clientId,
    client_secret: clientSecret,
    redirect_uris: redirectUris,
    grant_types: ['authorization_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
    id_token_signed_response_alg: idTokenAlg,
  }],
  jwks,
  // Signs the provider's cookies; they are not `Secure` (oidc-provider sets Secure only on
  // https requests), so they work over plain http on 127.0.0.1.
  cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
  responseTypes: ['code'],
  scopes: ['openid', 'email', 'profile'],
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name'],
  },
  conformIdTokenClaims: false,
  // oidc-provider's defaults, spelled out (its notices ask for that); seconds.
  ttl: {
    AccessToken: 3600,
    AuthorizationCode: 60,
    IdToken: 3600,
    Interaction: 3600,
    Grant: 14 * 24 * 3600,
    Session: 14 * 24 * 3600,
  },
  pkce: { required: () => true },
  features: {
    devInteractions: { enabled: true },
  },
  // A plain error page naming the error (the test browser quotes it when it fails).
  async renderError(ctx, out) {
    const escape = (text) => String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
    ctx.type = 'html';
    ctx.body = `<!DOCTYPE html><title>oidc-provider error</title>
<h1>oidc-provider error</h1>
<p>error: ${escape(out.error)}</p>
<p>error_description: ${escape(out.error_description ?? '')}</p>
`;
  },
  async findAccount(ctx, id) {
    return {
      accountId: id,
      async claims() {
        return {
          sub: id,
          email: id,
          email_verified: !id.startsWith('unverified'),
          name: `User ${id}`,
        };
      },
    };
  },
  // Auto-consent: the account's grant for the client always holds what this request asks
  // for, so the consent prompt never shows.
  async loadExistingGrant(ctx) {
    const { oidc } = ctx;
    const accountId = oidc.account.accountId;
    const clientId = oidc.client.clientId;
    const grantId = oidc.result?.consent?.grantId || oidc.session.grantIdFor(clientId);
    let grant = grantId ? await oidc.provider.Grant.find(grantId) : undefined;
    if (!grant || grant.accountId !== accountId || grant.clientId !== clientId) {
      grant = new oidc.provider.Grant({ accountId, clientId });
    }
    const scope = [...oidc.requestParamOIDCScopes].join(' ');
    if (scope) grant.addOIDCScope(scope);
    const claims = [...oidc.requestParamClaims];
    if (claims.length) grant.addOIDCClaims(claims);
    await grant.save();
    return grant;
  },
});

provider.on('server_error', (ctx, error) => console.error('oidc-provider server_error:', error));
server.on('request', provider.callback());

function stop() {
  server.closeAllConnections();
  server.close();
  process.exit(0);
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
process.stdin.on('end', stop);
process.stdin.on('close', stop);
process.stdin.on('error', stop);
process.stdin.resume();

process.stdout.write(`oidc-provider ready ${issuer}\n`);
