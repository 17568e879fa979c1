// Incremental Server-Sent Events parser for a fetch() body read in arbitrary pieces.
// A read may end inside an event, a line, a CRLF pair or a multi-byte UTF-8 character: everything incomplete
// is kept until the rest arrives. feed() returns the data of each event completed so far, in order.
// Comment lines (": ping" keep-alives) and fields other than "data" are ignored; several data lines of one
// event are joined with "\n"; an event the stream ends in the middle of is never dispatched.

const LINE_END = /\r\n|\r|\n/g;

export class SSEParser {
  constructor() {
    this.decoder = new TextDecoder("utf-8");
    this.buffer = "";
    this.data = [];
  }

  /** @param {Uint8Array} bytes  @returns {string[]} */
  feed(bytes) {
    this.buffer += this.decoder.decode(bytes, { stream: true });
    const payloads = [];
    let position = 0;
    LINE_END.lastIndex = 0;
    for (let match; (match = LINE_END.exec(this.buffer)) !== null; ) {
      const end = match.index + match[0].length;
      if (match[0] === "\r" && end === this.buffer.length) break; // its "\n" may be in the next read
      const line = this.buffer.slice(position, match.index);
      position = end;
      if (line !== "") this.field(line);
      else if (this.data.length > 0) payloads.push(this.data.splice(0).join("\n"));
    }
    this.buffer = this.buffer.slice(position);
    return payloads;
  }

  field(line) {
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    if (name !== "data") return;
    const value = colon < 0 ? "" : line.slice(colon + 1);
    this.data.push(value.startsWith(" ") ? value.slice(1) : value);
  }
}
