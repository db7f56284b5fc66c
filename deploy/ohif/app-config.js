/** @type {AppTypes.Config} */
// OHIF Viewer 3.13.2 configuration for ddn-node's demo and viewer tests.
//
// One DICOMweb data source at the *same origin* as the viewer: ddn_node.demo.ohif serves
// the prebuilt OHIF site and forwards /dicom-web/* to Orthanc's DICOMweb plugin, so the
// browser never makes a cross-origin request (Orthanc 1.10 sends no CORS headers) and the
// roots below stay relative, whatever host and port the viewer is served on. Any other web
// server can serve this file as /app-config.js in the same way (reverse-proxy /dicom-web/).
//
// Open one study with /viewer?StudyInstanceUIDs=<uid> (add &SeriesInstanceUIDs=<uid> to
// start on a series). The study list is off: the demo links to studies, it is no PACS UI.
window.config = {
  name: 'ddn-node',
  routerBasename: '/',
  extensions: [],
  modes: [],
  customizationService: {
    // No onboarding tour: its overlay sits over the viewer and takes the clicks.
    'ohif.tours': { $set: [] },
    // No cine player popping up on single-frame Secondary Captures (Modality OT).
    autoCineModalities: { $set: [] },
  },
  showStudyList: false,
  // The demo and the tests run on small machines: few workers, few parallel requests.
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  // The node's objects carry their own "not for diagnostic use" wording.
  investigationalUseDialog: { option: 'never' },
  maxNumRequests: {
    interaction: 20,
    thumbnail: 4,
    prefetch: 4,
  },
  showErrorDetails: 'always',
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'ddn-node demo PACS (Orthanc)',
        name: 'orthanc',
        wadoUriRoot: '/dicom-web',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        qidoSupportsIncludeField: true,
        supportsReject: false,
        imageRendering: 'wadors',
        // Thumbnails decoded in the browser: Orthanc's DICOMweb 1.7 /rendered is slow
        // and not needed.
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        dicomUploadEnabled: false,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: {
          enabled: true,
        },
      },
    },
  ],
};
