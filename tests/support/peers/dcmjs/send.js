#!/usr/bin/env node
// Test-only DICOM sender built on dcmjs-dimse: one association, an optional C-ECHO, then one
// C-STORE per file. Prints one JSON object per line on stdout:
//   {"event":"association","accepted":true,"contexts":[{"id":1,"abstract_syntax":"...","result":0,...}]}
//   {"event":"association","accepted":false,"reject":{"result":1,"source":1,"reason":3}}
//   {"event":"echo","status":0}
//   {"event":"store","file":"...","sop_class":"...","sop_instance":"...","status":0,"context":"accepted"}
//   {"event":"store","file":"...","status":null,"context":"rejected","context_result":3,...}
//   {"event":"done","network_error":null}
// Exit status: 0 when the run completed (whatever the DIMSE statuses), 2 on usage errors,
// 3 on a network error before the association ended. The caller judges the statuses.
'use strict';

const fs = require('fs');
const path = require('path');
const dimse = require('dcmjs-dimse');

const { Client, log } = dimse;
const { CEchoRequest, CStoreRequest } = dimse.requests;
const { TransferSyntax } = dimse.constants;

function usage(message) {
  process.stderr.write(
    `${message ? message + '\n' : ''}usage: send.js --host H --port P [--calling AET] [--called AET]\n` +
      '         [--echo] [--timeout-ms N] [--tls-key F --tls-cert F --tls-ca F] [--] FILE...\n'
  );
  process.exit(2);
}

function parseArgs(argv) {
  const opts = { host: '127.0.0.1', port: 0, calling: 'DCMJS_SCU', called: 'ANY-SCP', echo: false, timeoutMs: 60000, files: [] };
  for (let i = 0; i < argv.length; i += 1) {
    const a = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) usage(`missing value after ${a}`);
      i += 1;
      return argv[i];
    };
    if (a === '--') {
      opts.files.push(...argv.slice(i + 1));
      break;
    } else if (a === '--host') opts.host = next();
    else if (a === '--port') opts.port = parseInt(next(), 10);
    else if (a === '--calling') opts.calling = next();
    else if (a === '--called') opts.called = next();
    else if (a === '--echo') opts.echo = true;
    else if (a === '--timeout-ms') opts.timeoutMs = parseInt(next(), 10);
    else if (a === '--tls-key') opts.tlsKey = next();
    else if (a === '--tls-cert') opts.tlsCert = next();
    else if (a === '--tls-ca') opts.tlsCa = next();
    else if (a.startsWith('--')) usage(`unknown option ${a}`);
    else opts.files.push(a);
  }
  if (!opts.port) usage('--port is required');
  if (!opts.echo && opts.files.length === 0) usage('nothing to do: give --echo and/or files');
  return opts;
}

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function main() {
  const opts = parseArgs(process.argv.slice(2));
  log.setLevel(process.env.DCMJS_LOG_LEVEL || 'warn');

  const client = new Client();
  const pending = []; // {file, request, result}
  let echoRequest;
  let echoSeen = false;

  if (opts.echo) {
    echoRequest = new CEchoRequest();
    echoRequest.on('response', (response) => {
      echoSeen = true;
      emit({ event: 'echo', status: response.getStatus() });
    });
    client.addRequest(echoRequest);
  }

  for (const file of opts.files) {
    const entry = { file: path.resolve(file), request: undefined, done: false };
    pending.push(entry);
    let request;
    try {
      fs.accessSync(file, fs.constants.R_OK);
      request = new CStoreRequest(file);
      // Offer the universal uncompressed syntaxes too, so any SCP can take it.
      request.setAdditionalTransferSyntaxes([
        TransferSyntax.ExplicitVRLittleEndian,
        TransferSyntax.ImplicitVRLittleEndian,
      ]);
    } catch (err) {
      entry.done = true;
      emit({ event: 'store', file: entry.file, status: null, context: null, error: `cannot read: ${err.message}` });
      continue;
    }
    entry.request = request;
    request.on('response', (response) => {
      entry.done = true;
      const comment = typeof response.getErrorComment === 'function' ? response.getErrorComment() : undefined;
      emit({
        event: 'store',
        file: entry.file,
        sop_class: request.getAffectedSopClassUid(),
        sop_instance: request.getAffectedSopInstanceUid(),
        status: response.getStatus(),
        context: 'accepted',
        error_comment: comment || null,
      });
    });
    client.addRequest(request);
  }

  if (!pending.some((p) => p.request) && !echoRequest) {
    emit({ event: 'done', network_error: null });
    return;
  }

  let association;
  let networkError = null;
  let finished = false;

  const finish = (exitCode) => {
    if (finished) return;
    finished = true;
    clearTimeout(timer);
    // Requests the library skipped (no accepted presentation context) never get a response.
    for (const entry of pending) {
      if (entry.done || !entry.request) continue;
      const out = { event: 'store', file: entry.file, status: null };
      try {
        out.sop_class = entry.request.getAffectedSopClassUid();
        out.sop_instance = entry.request.getAffectedSopInstanceUid();
      } catch (e) {
        // keep what we have
      }
      if (association) {
        const ctx = association
          .getPresentationContexts()
          .map((c) => association.getPresentationContext(c.id))
          .find((c) => c.getAbstractSyntaxUid() === out.sop_class);
        if (ctx && ctx.getResult() !== 0) {
          out.context = 'rejected';
          out.context_result = ctx.getResult();
          out.context_result_description = ctx.getResultDescription();
        } else {
          out.context = ctx ? 'accepted' : 'absent';
          out.error = 'no response';
        }
      } else {
        out.context = null;
        out.error = networkError ? `network error: ${networkError}` : 'association not established';
      }
      emit(out);
    }
    if (echoRequest && !echoSeen) emit({ event: 'echo', status: null });
    emit({ event: 'done', network_error: networkError });
    process.exitCode = exitCode;
  };

  const timer = setTimeout(() => {
    networkError = `timed out after ${opts.timeoutMs} ms`;
    try {
      client.abort();
    } catch (e) {
      // not connected yet
    }
    finish(3);
    setImmediate(() => process.exit(3));
  }, opts.timeoutMs);

  client.on('associationAccepted', (assoc) => {
    association = assoc;
    const contexts = assoc.getPresentationContexts().map((c) => {
      const ctx = assoc.getPresentationContext(c.id);
      return {
        id: c.id,
        abstract_syntax: ctx.getAbstractSyntaxUid(),
        result: ctx.getResult(),
        result_description: ctx.getResultDescription(),
        transfer_syntax: ctx.getAcceptedTransferSyntaxUid() || null,
      };
    });
    emit({ event: 'association', accepted: true, contexts });
  });
  client.on('associationRejected', (reject) => {
    emit({ event: 'association', accepted: false, reject });
  });
  client.on('networkError', (err) => {
    networkError = err && err.message ? err.message : String(err);
  });
  client.on('closed', () => finish(networkError && !association ? 3 : 0));

  const sendOpts = {
    connectTimeout: opts.timeoutMs,
    associationTimeout: opts.timeoutMs,
    pduTimeout: opts.timeoutMs,
    associationLingerTimeout: 0,
  };
  if (opts.tlsCert || opts.tlsKey || opts.tlsCa) {
    sendOpts.securityOptions = {
      key: opts.tlsKey ? fs.readFileSync(opts.tlsKey) : undefined,
      cert: opts.tlsCert ? fs.readFileSync(opts.tlsCert) : undefined,
      ca: opts.tlsCa ? fs.readFileSync(opts.tlsCa) : undefined,
      rejectUnauthorized: true,
    };
  }
  client.send(opts.host, opts.port, opts.calling, opts.called, sendOpts);
}

main();
