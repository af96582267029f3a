// A relying party that signs in to Gatehouse with panva's openid-client (v6), run by
// tests/e2e/oidc.rs. The app side is all openid-client: discovery, the authorization URL with
// PKCE S256, state and nonce, the code exchange with ID token validation, userinfo, refresh,
// revocation and RP-initiated logout. The person's side is a scripted browser without a
// browser: it keeps cookies and fills in the hosted pages' forms (email and password, the
// choice of second factor, the TOTP code it computes from the secret).
//
//   GATEHOUSE_ISSUER=http://127.0.0.1:PORT/tenants/ID CLIENT_ID=… [CLIENT_SECRET=…] \
//   REDIRECT_URI=… POST_LOGOUT_URI=… EMAIL=… PASSWORD=… TOTP_SECRET=… node tests/oidc/rp.mjs
//
// Prints one JSON object on stdout with what it saw; exits non-zero with the reason on stderr
// when a step fails (openid-client refusing a response counts as a failure).
import * as client from 'openid-client';
import * as crypto from 'node:crypto';

const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined) throw new Error(`${name} is not set`);
  return value;
};

const issuer = new URL(env('GATEHOUSE_ISSUER'));
const clientId = env('CLIENT_ID');
const clientSecret = process.env.CLIENT_SECRET || undefined;
const redirectUri = env('REDIRECT_URI');
const postLogoutUri = env('POST_LOGOUT_URI');
const email = env('EMAIL');
const password = env('PASSWORD');
const totpSecret = env('TOTP_SECRET');

// --- the person's browser ------------------------------------------------------------------

const jar = new Map();
const steps = [];

function keepCookies(response) {
  for (const line of response.headers.getSetCookie()) {
    const [pair, ...attributes] = line.split(';').map((s) => s.trim());
    const eq = pair.indexOf('=');
    const name = pair.slice(0, eq);
    const value = pair.slice(eq + 1);
    const expired = attributes.some((a) => a.toLowerCase() === 'max-age=0');
    if (expired || value === '') jar.delete(name);
    else jar.set(name, value);
  }
}

function cookieHeader() {
  return [...jar].map(([n, v]) => `${n}=${v}`).join('; ');
}

async function browse(url, form) {
  const init = { redirect: 'manual', headers: { cookie: cookieHeader(), 'user-agent': 'gatehouse-rp-test' } };
  if (form) {
    init.method = 'POST';
    init.headers['content-type'] = 'application/x-www-form-urlencoded';
    init.body = new URLSearchParams(form).toString();
  }
  const response = await fetch(url, init);
  keepCookies(response);
  const body = await response.text();
  return { status: response.status, location: response.headers.get('location'), body, headers: response.headers };
}

function hidden(body, name) {
  const match = body.match(new RegExp(`name="${name}" value="([^"]*)"`));
  if (!match) throw new Error(`no ${name} field in the page:\n${body}`);
  return match[1].replaceAll('&quot;', '"').replaceAll('&amp;', '&');
}

function formAction(body) {
  const match = body.match(/<form method="post" action="([^"]*)"/);
  if (!match) throw new Error(`no form in the page:\n${body}`);
  return new URL(match[1].replaceAll('&amp;', '&'), issuer).toString();
}

function base32(text) {
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';
  let bits = '';
  for (const c of text.replace(/=+$/, '').toUpperCase()) {
    const index = alphabet.indexOf(c);
    if (index < 0) throw new Error('bad base32');
    bits += index.toString(2).padStart(5, '0');
  }
  const bytes = [];
  for (let i = 0; i + 8 <= bits.length; i += 8) bytes.push(parseInt(bits.slice(i, i + 8), 2));
  return Buffer.from(bytes);
}

// A TOTP code `step` steps from now (Gatehouse accepts ±1 step, and never a step twice).
function totp(secret, step = 0) {
  const counter = Buffer.alloc(8);
  counter.writeBigUInt64BE(BigInt(Math.floor(Date.now() / 1000 / 30) + step));
  const mac = crypto.createHmac('sha1', base32(secret)).update(counter).digest();
  const offset = mac[mac.length - 1] & 0xf;
  const value = (mac.readUInt32BE(offset) & 0x7fffffff) % 1_000_000;
  return value.toString().padStart(6, '0');
}

/// Walks the hosted pages from `page` until Gatehouse redirects back to the app.
async function signIn(page, totpStep = 0) {
  for (let i = 0; i < 8; i += 1) {
    if (page.status === 303) {
      if (!page.location.startsWith(redirectUri)) throw new Error(`redirected to ${page.location}`);
      return page.location;
    }
    if (page.status !== 200) throw new Error(`page answered ${page.status}:\n${page.body}`);
    const csp = page.headers.get('content-security-policy') ?? '';
    if (!csp.includes("frame-ancestors 'none'")) throw new Error(`page CSP: ${csp}`);
    const action = hidden(page.body, 'action');
    const csrf = hidden(page.body, 'csrf');
    const target = formAction(page.body);
    steps.push(action);
    if (action === 'start_password') {
      page = await browse(target, { csrf, action, email, password });
    } else if (action === 'select_mfa') {
      if (!page.body.includes('value="totp"')) throw new Error('TOTP is not offered');
      page = await browse(target, { csrf, action, method: 'totp' });
    } else if (action === 'mfa_code') {
      page = await browse(target, { csrf, action, code: totp(totpSecret, totpStep) });
    } else {
      throw new Error(`unexpected page ${action}:\n${page.body}`);
    }
  }
  throw new Error('the sign-in did not end');
}

// --- the app -------------------------------------------------------------------------------

const auth = clientSecret ? client.ClientSecretBasic(clientSecret) : client.None();
const config = await client.discovery(issuer, clientId, clientSecret, auth, {
  execute: [client.allowInsecureRequests],
});
const metadata = config.serverMetadata();

async function authorize(extra = {}) {
  const verifier = client.randomPKCECodeVerifier();
  const state = client.randomState();
  const nonce = client.randomNonce();
  const url = client.buildAuthorizationUrl(config, {
    redirect_uri: redirectUri,
    scope: 'openid email',
    code_challenge: await client.calculatePKCECodeChallenge(verifier),
    code_challenge_method: 'S256',
    state,
    nonce,
    ...extra,
  });
  return { url, verifier, state, nonce };
}

const out = { discovery: { issuer: metadata.issuer, pkce: metadata.code_challenge_methods_supported } };

// 1. Sign in: authorization code + PKCE, through the hosted pages.
const first = await authorize({ login_hint: email });
const firstPage = await browse(first.url);
if (!firstPage.body.includes(`value="${email}"`)) throw new Error('login_hint was not prefilled');
const callback = await signIn(firstPage);
out.steps = steps;
const tokens = await client.authorizationCodeGrant(config, new URL(callback), {
  pkceCodeVerifier: first.verifier,
  expectedState: first.state,
  expectedNonce: first.nonce,
  idTokenExpected: true,
});
const claims = tokens.claims();
out.id_token = { sub: claims.sub, nonce_matched: claims.nonce === first.nonce, amr: claims.amr, email: claims.email };
out.refresh_token_issued = typeof tokens.refresh_token === 'string';

// 2. Userinfo with the access token.
const userinfo = await client.fetchUserInfo(config, tokens.access_token, claims.sub);
out.userinfo = { sub: userinfo.sub, email: userinfo.email };

// 3. Refresh: new tokens, the refresh token rotated.
const refreshed = await client.refreshTokenGrant(config, tokens.refresh_token);
out.refreshed = {
  rotated: refreshed.refresh_token !== tokens.refresh_token,
  same_subject: refreshed.claims()?.sub === claims.sub,
};

// 4. Silent sign-in (prompt=none) with the browser's session: a code without any page.
const silent = await authorize({ prompt: 'none' });
const silentAnswer = await browse(silent.url);
if (silentAnswer.status !== 303) throw new Error(`prompt=none answered ${silentAnswer.status}: ${silentAnswer.body}`);
const silentTokens = await client.authorizationCodeGrant(config, new URL(silentAnswer.location), {
  pkceCodeVerifier: silent.verifier,
  expectedState: silent.state,
  expectedNonce: silent.nonce,
  idTokenExpected: true,
});
out.silent = { same_subject: silentTokens.claims().sub === claims.sub, refresh_token_issued: 'refresh_token' in silentTokens };

// 5. RP-initiated logout: back to the registered URI with the state; the session is over.
const logoutState = client.randomState();
const logoutUrl = client.buildEndSessionUrl(config, {
  id_token_hint: tokens.id_token,
  post_logout_redirect_uri: postLogoutUri,
  state: logoutState,
});
const logout = await browse(logoutUrl);
out.logout = { status: logout.status, location: logout.location, state_returned: logout.location === `${postLogoutUri}?state=${logoutState}` };
try {
  await client.fetchUserInfo(config, refreshed.access_token, claims.sub);
  out.after_logout_userinfo = 'accepted';
} catch (error) {
  out.after_logout_userinfo = error.error ?? error.code ?? String(error);
}
try {
  await client.refreshTokenGrant(config, refreshed.refresh_token);
  out.after_logout_refresh = 'accepted';
} catch (error) {
  out.after_logout_refresh = error.error ?? error.code ?? String(error);
}
const again = await authorize({ prompt: 'none' });
const againAnswer = await browse(again.url);
out.after_logout_prompt_none = new URL(againAnswer.location ?? 'about:blank').searchParams.get('error');

// 6. Revocation of a fresh sign-in's refresh token ends that session. (The TOTP code is the
// next step's: the current one was spent by the first sign-in.)
steps.length = 0;
const second = await authorize();
const secondTokens = await client.authorizationCodeGrant(config, new URL(await signIn(await browse(second.url), 1)), {
  pkceCodeVerifier: second.verifier,
  expectedState: second.state,
  expectedNonce: second.nonce,
});
await client.tokenRevocation(config, secondTokens.refresh_token);
try {
  await client.refreshTokenGrant(config, secondTokens.refresh_token);
  out.after_revoke_refresh = 'accepted';
} catch (error) {
  out.after_revoke_refresh = error.error ?? error.code ?? String(error);
}

console.log(JSON.stringify(out));
