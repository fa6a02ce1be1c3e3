"""The operator console's static files (`index.html`, `console.js`, `console.css`), served at
`/console` by `smolora.server.api.console.router`; package data, no Python code."""
