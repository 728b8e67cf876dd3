// A real OpenID provider (oidc-provider) over HTTPS for tests/oidc.rs, on 127.0.0.1
// port 0, issuer https://localhost:PORT.
//
//   node provider.mjs CERT KEY CA
//
// Prints "READY <port>" once it listens. Commands on stdin, one a line; each answers
// one line on stdout:
//   jwt            → "TOKEN <t>": a client_credentials JWT access token for the resource
//                    wsgate (audience "wsgate", RS256, scope "chat")
//   opaque         → "TOKEN <t>": a client_credentials opaque access token (scope "chat")
//   revoke <t>     → "REVOKED <status>": RFC 7009 revocation of <t>
//   swap / unswap  → "OK": the discovery document names another issuer / ours again
// The gateway introspects as client "wsgate" (secret in the WSGATE_SECRET env).

import fs from 'node:fs';
import https from 'node:https';
import readline from 'node:readline';
import Provider from 'oidc-provider';

const [cert, key, ca] = process.argv.slice(2).map((f) => fs.readFileSync(f));
const gatewaySecret = process.env.WSGATE_SECRET || 'wsgate-test-secret';
const appSecret = 'app-test-secret';
let provider;
let swapped = false;

const server = https.createServer({ cert, key }, (req, res) => {
  if (swapped && req.url === '/.well-known/openid-configuration') {
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify({ issuer: 'https://evil.example', jwks_uri: `${provider.issuer}/jwks` }));
    return;
  }
  provider.callback()(req, res);
});

server.listen(0, '127.0.0.1', () => {
  const { port } = server.address();
  provider = new Provider(`https://localhost:${port}`, {
    clients: [
      {
        client_id: 'wsgate',
        client_secret: gatewaySecret,
        grant_types: [],
        response_types: [],
        redirect_uris: [],
        token_endpoint_auth_method: 'client_secret_basic',
      },
      {
        client_id: 'app',
        client_secret: appSecret,
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
        scope: 'chat',
      },
    ],
    scopes: ['chat'],
    cookies: { keys: ['wsgate-test-cookie-key'] },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: { enabled: true },
      revocation: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: (ctx, client, oneOf) => oneOf,
        useGrantedResource: () => true,
        getResourceServerInfo: () => ({
          scope: 'chat',
          audience: 'wsgate',
          accessTokenFormat: 'jwt',
          accessTokenTTL: 600,
          jwt: { sign: { alg: 'RS256' } },
        }),
      },
    },
  });
  console.log(`READY ${port}`);
});

function post(path, form, user, pass) {
  const body = new URLSearchParams(form).toString();
  return new Promise((resolve, reject) => {
    const req = https.request(
      {
        host: '127.0.0.1',
        servername: 'localhost',
        port: server.address().port,
        path,
        method: 'POST',
        ca,
        headers: {
          host: `localhost:${server.address().port}`,
          'content-type': 'application/x-www-form-urlencoded',
          'content-length': Buffer.byteLength(body),
          authorization: `Basic ${Buffer.from(`${user}:${pass}`).toString('base64')}`,
        },
      },
      (res) => {
        let data = '';
        res.on('data', (c) => { data += c; });
        res.on('end', () => resolve({ status: res.statusCode, data }));
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}

const rl = readline.createInterface({ input: process.stdin });
rl.on('line', async (line) => {
  const [cmd, arg] = line.trim().split(/\s+/);
  try {
    if (cmd === 'jwt' || cmd === 'opaque') {
      const form = { grant_type: 'client_credentials', scope: 'chat' };
      if (cmd === 'jwt') form.resource = 'urn:wsgate';
      const { status, data } = await post('/token', form, 'app', appSecret);
      const token = status === 200 ? JSON.parse(data).access_token : null;
      console.log(token ? `TOKEN ${token}` : `ERROR ${status} ${data}`);
    } else if (cmd === 'revoke') {
      const { status } = await post('/token/revocation', { token: arg }, 'app', appSecret);
      console.log(`REVOKED ${status}`);
    } else if (cmd === 'swap' || cmd === 'unswap') {
      swapped = cmd === 'swap';
      console.log('OK');
    } else {
      console.log(`ERROR unknown command ${cmd}`);
    }
  } catch (e) {
    console.log(`ERROR ${e.message}`);
  }
});
rl.on('close', () => process.exit(0));
