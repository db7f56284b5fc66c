#!/usr/bin/env node
// Test-only DICOM Storage SCP built on dcmjs-dimse. Stores each received instance as
// OUT/<SOPInstanceUID>.dcm (written to a temporary name, then renamed, so a file that
// appears is complete) and prints one JSON object per line on stdout:
//   {"event":"listening","port":11112}
//   {"event":"association","calling":"X","called":"Y","accepted":true,"contexts":[...]}
//   {"event":"echo","calling":"X"}
//   {"event":"stored","path":"...","sop_class":"...","sop_instance":"...","calling":"X"}
//   {"event":"refused","sop_class":"...","sop_instance":"...","status":42752}
//   {"event":"released"}
//
// Options:
//   --port N            listening port (required)
//   --aet AET           our AE title (called AE title is checked only with --check-called)
//   --out DIR           where to store (required)
//   --accept UID[,UID]  SOP classes whose presentation contexts are accepted ("*" = any,
//                       the default); anything else is refused with result 3
//                       (abstract-syntax-not-supported)
//   --reject-context UID[,UID]  refuse these SOP classes at the presentation context level
//                       even when --accept would take them
//   --fail UID=STATUS   answer C-STORE of that SOP class with STATUS (hex 0xA700 or decimal)
//                       without storing it; "*=0xA700" for every SOP class; repeatable
//   --allow-calling AET[,AET]   reject the association (permanent, calling AE not recognised)
//                       for any other calling AE title
//   --reject-association permanent|transient   reject every association (service user,
//                       no reason given / temporary congestion for transient)
//   --check-called      reject when the called AE title is not --aet
//   --commit-to AET@HOST:PORT  act as Storage Commitment SCP: answer each N-ACTION by
//                       sending the N-EVENT-REPORT to AET@HOST:PORT on a new association
//                       first, and only then the N-ACTION response (an answer that
//                       arrives before the requester has finished its own bookkeeping)
//   --commit-fail UID[,UID]  SOP classes whose instances the report lists as failed
//                       (Failure Reason 0x0110, processing failure)
//   --tls-key F --tls-cert F [--tls-ca F]  DICOM TLS; with --tls-ca a client certificate
//                       signed by that CA is required
'use strict';

const fs = require('fs');
const path = require('path');
const dimse = require('dcmjs-dimse');

const { Server, Scp, log } = dimse;
const { CEchoResponse, CStoreResponse, NActionResponse } = dimse.responses;
const { NEventReportRequest } = dimse.requests;
const { Client, Dataset } = dimse;
const { Status, PresentationContextResult, RejectResult, RejectSource, RejectReason, TransferSyntax, SopClass } =
  dimse.constants;

function usage(message) {
  process.stderr.write(`${message}\nsee the header of receive.js for the options\n`);
  process.exit(2);
}

function parseStatus(text) {
  const value = /^0x/i.test(text) ? parseInt(text.slice(2), 16) : parseInt(text, 10);
  if (!Number.isInteger(value) || value < 0 || value > 0xffff) usage(`bad status ${text}`);
  return value;
}

function parseArgs(argv) {
  const opts = {
    port: 0,
    aet: 'DCMJS_SCP',
    out: '',
    accept: ['*'],
    rejectContext: [],
    fail: {},
    allowCalling: null,
    rejectAssociation: null,
    checkCalled: false,
    commitTo: null,
    commitFail: [],
  };
  const list = (v) => v.split(',').map((s) => s.trim()).filter(Boolean);
  for (let i = 0; i < argv.length; i += 1) {
    const a = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) usage(`missing value after ${a}`);
      i += 1;
      return argv[i];
    };
    if (a === '--port') opts.port = parseInt(next(), 10);
    else if (a === '--aet') opts.aet = next();
    else if (a === '--out') opts.out = next();
    else if (a === '--accept') opts.accept = list(next());
    else if (a === '--reject-context') opts.rejectContext.push(...list(next()));
    else if (a === '--fail') {
      const [uid, status] = next().split('=');
      if (!uid || !status) usage('--fail wants UID=STATUS');
      opts.fail[uid] = parseStatus(status);
    } else if (a === '--allow-calling') opts.allowCalling = list(next());
    else if (a === '--reject-association') opts.rejectAssociation = next();
    else if (a === '--check-called') opts.checkCalled = true;
    else if (a === '--commit-to') {
      const m = /^([^@]+)@([^:]+):(\d+)$/.exec(next());
      if (!m) usage('--commit-to wants AET@HOST:PORT');
      opts.commitTo = { aet: m[1], host: m[2], port: parseInt(m[3], 10) };
    } else if (a === '--commit-fail') opts.commitFail.push(...list(next()));
    else if (a === '--tls-key') opts.tlsKey = next();
    else if (a === '--tls-cert') opts.tlsCert = next();
    else if (a === '--tls-ca') opts.tlsCa = next();
    else usage(`unknown option ${a}`);
  }
  if (!opts.port) usage('--port is required');
  if (!opts.out) usage('--out is required');
  if (opts.rejectAssociation && !['permanent', 'transient'].includes(opts.rejectAssociation)) {
    usage('--reject-association wants permanent or transient');
  }
  return opts;
}

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

const opts = parseArgs(process.argv.slice(2));
log.setLevel(process.env.DCMJS_LOG_LEVEL || 'warn');
fs.mkdirSync(opts.out, { recursive: true });

// Preferred order when the SCU offers several transfer syntaxes: uncompressed first.
const PREFERRED_TS = [TransferSyntax.ExplicitVRLittleEndian, TransferSyntax.ImplicitVRLittleEndian];

function wantsContext(sopClass) {
  if (sopClass === SopClass.Verification) return true;
  if (opts.rejectContext.includes(sopClass)) return false;
  return opts.accept.includes('*') || opts.accept.includes(sopClass);
}

class PeerScp extends Scp {
  associationRequested(association) {
    this.association = association;
    const calling = association.getCallingAeTitle();
    const called = association.getCalledAeTitle();
    let reject = null;
    if (opts.rejectAssociation === 'permanent') {
      reject = [RejectResult.Permanent, RejectSource.ServiceUser, RejectReason.NoReasonGiven];
    } else if (opts.rejectAssociation === 'transient') {
      reject = [RejectResult.Transient, RejectSource.ServiceProviderPresentation, RejectReason.TemporaryCongestion];
    } else if (opts.allowCalling && !opts.allowCalling.includes(calling)) {
      reject = [RejectResult.Permanent, RejectSource.ServiceUser, RejectReason.CallingAeNotRecognized];
    } else if (opts.checkCalled && called !== opts.aet) {
      reject = [RejectResult.Permanent, RejectSource.ServiceUser, RejectReason.CalledAeNotRecognized];
    }
    if (reject) {
      emit({ event: 'association', calling, called, accepted: false, reject: { result: reject[0], source: reject[1], reason: reject[2] } });
      this.sendAssociationReject(...reject);
      return;
    }
    const contexts = [];
    for (const c of association.getPresentationContexts()) {
      const ctx = association.getPresentationContext(c.id);
      const sopClass = ctx.getAbstractSyntaxUid();
      const offered = ctx.getTransferSyntaxUids();
      if (!wantsContext(sopClass)) {
        ctx.setResult(PresentationContextResult.RejectAbstractSyntaxNotSupported);
      } else {
        const ts = PREFERRED_TS.find((t) => offered.includes(t)) || offered[0];
        if (ts) ctx.setResult(PresentationContextResult.Accept, ts);
        else ctx.setResult(PresentationContextResult.RejectTransferSyntaxesNotSupported);
      }
      const accepted = ctx.getResult() === PresentationContextResult.Accept;
      contexts.push({
        id: c.id,
        abstract_syntax: sopClass,
        result: ctx.getResult(),
        transfer_syntax: accepted ? ctx.getAcceptedTransferSyntaxUid() || null : null,
      });
    }
    emit({ event: 'association', calling, called, accepted: true, contexts });
    this.sendAssociationAccept();
  }

  cEchoRequest(request, callback) {
    const response = CEchoResponse.fromRequest(request);
    response.setStatus(Status.Success);
    emit({ event: 'echo', calling: this.association ? this.association.getCallingAeTitle() : null });
    callback(response);
  }

  cStoreRequest(request, callback) {
    const response = CStoreResponse.fromRequest(request);
    const sopClass = request.getAffectedSopClassUid();
    const sopInstance = request.getAffectedSopInstanceUid();
    const failStatus = sopClass in opts.fail ? opts.fail[sopClass] : opts.fail['*'];
    if (failStatus !== undefined) {
      response.setStatus(failStatus);
      emit({ event: 'refused', sop_class: sopClass, sop_instance: sopInstance, status: failStatus });
      callback(response);
      return;
    }
    const safeName = String(sopInstance).replace(/[^0-9A-Za-z.]/g, '_');
    const target = path.join(opts.out, `${safeName}.dcm`);
    const partial = path.join(opts.out, `.${safeName}.part`);
    const dataset = request.getDataset();
    dataset.toFile(partial, (err) => {
      if (err) {
        response.setStatus(0xa700); // Refused: Out of Resources
        emit({ event: 'error', sop_instance: sopInstance, error: err.message });
        callback(response);
        return;
      }
      fs.renameSync(partial, target);
      emit({
        event: 'stored',
        path: target,
        sop_class: sopClass,
        sop_instance: sopInstance,
        transfer_syntax: dataset.getTransferSyntaxUid(),
        calling: this.association ? this.association.getCallingAeTitle() : null,
      });
      response.setStatus(Status.Success);
      callback(response);
    });
  }

  nActionRequest(request, callback) {
    const response = NActionResponse.fromRequest(request);
    if (!opts.commitTo || request.getRequestedSopClassUid() !== SopClass.StorageCommitmentPushModel) {
      response.setStatus(0x0112); // No such SOP Instance
      callback(response);
      return;
    }
    const asked = request.getDataset();
    const transaction = asked.getElement('TransactionUID');
    const refs = asked.getElement('ReferencedSOPSequence') || [];
    const failed = refs.filter((r) => opts.commitFail.includes(r.ReferencedSOPClassUID));
    const committed = refs.filter((r) => !opts.commitFail.includes(r.ReferencedSOPClassUID));
    const elements = { TransactionUID: transaction };
    if (committed.length) elements.ReferencedSOPSequence = committed;
    if (failed.length) elements.FailedSOPSequence = failed.map((r) => ({ ...r, FailureReason: 0x0110 }));
    const report = new NEventReportRequest(
      SopClass.StorageCommitmentPushModel,
      '1.2.840.10008.1.20.1.1',
      failed.length ? 2 : 1
    );
    report.setDataset(new Dataset(elements));
    const client = new Client();
    let reportStatus = null;
    report.on('response', (r) => {
      reportStatus = r.getStatus();
    });
    client.addRequest(report);
    client.on('networkError', (e) => emit({ event: 'commitment_report_error', error: e && e.message ? e.message : String(e) }));
    client.on('closed', () => {
      emit({ event: 'commitment_reported', transaction_uid: transaction, committed: committed.length, failed: failed.length, status: reportStatus });
      response.setStatus(Status.Success);
      callback(response);
    });
    client.send(opts.commitTo.host, opts.commitTo.port, opts.aet, opts.commitTo.aet, { associationLingerTimeout: 0 });
  }

  associationReleaseRequested() {
    emit({ event: 'released' });
    this.sendAssociationReleaseResponse();
  }
}

const server = new Server(PeerScp);
server.on('listening', () => emit({ event: 'listening', port: opts.port }));
server.on('networkError', (e) => emit({ event: 'network_error', error: e && e.message ? e.message : String(e) }));

const listenOpts = { associationTimeout: 120000, pduTimeout: 120000 };
if (opts.tlsKey || opts.tlsCert) {
  listenOpts.securityOptions = {
    key: fs.readFileSync(opts.tlsKey),
    cert: fs.readFileSync(opts.tlsCert),
    ca: opts.tlsCa ? fs.readFileSync(opts.tlsCa) : undefined,
    requestCert: Boolean(opts.tlsCa),
    rejectUnauthorized: Boolean(opts.tlsCa),
  };
}
server.listen(opts.port, listenOpts);

const shutdown = () => {
  server.close();
  process.exit(0);
};
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
