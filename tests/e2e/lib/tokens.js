// A signed stream name, as AnyCable makes it (anycable-rails' AnyCable::Streams.signed):
// base64(JSON(name)) + "--" + hex(HMAC-SHA256(streams secret, that base64)).
import { createHmac } from "node:crypto";

export function signedStream(name, secret) {
  const encoded = Buffer.from(JSON.stringify(name)).toString("base64");
  const digest = createHmac("sha256", secret).update(encoded).digest("hex");
  return `${encoded}--${digest}`;
}
